"""A tiny, deterministic, random-weight Llama model for tests.

Everything is built locally (no downloads): a byte-level BPE tokenizer trained on a
generated English corpus, a chat template, and a 2-layer Llama with seeded weights.
The same ``seed`` always gives a byte-identical ``model.safetensors``.

The ``lm_head`` rows of the special tokens are zero, so their logit is exactly 0 while
the ~2000 other logits are random: greedy decoding (temperature 0) then never picks a
special token, i.e. it always returns non-empty text and runs to ``max_tokens``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vllm_batch.weights._atomic import build_atomically
from vllm_batch.weights._seeded import seeded_model

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
START_TOKEN = "<|start|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, START_TOKEN]  # ids 0..3
VOCAB_SIZE = 2000
MAX_POSITION_EMBEDDINGS = 2048
ASSISTANT_HEADER = f"{START_TOKEN}assistant\n"

# One turn is "<|start|>{role}\n{content}<|eos|>\n"; generation prompt is "<|start|>assistant\n".
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start|>' + message['role'] + '\\n' + message['content'] + eos_token + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start|>assistant\\n' -}}"
    "{%- endif -%}"
)


def _phrases(text: str, sep: str | None = ",") -> tuple[str, ...]:
    """Split a block of ``sep``-separated phrases (``None``: any whitespace)."""
    return tuple(p.strip() for p in text.split(sep) if p.strip())


_SUBJECTS = _phrases(
    """
the old farmer, a young doctor, my neighbour, the quiet student, our teacher,
the clever fox, a tired engineer, the little girl, his brother, the captain,
a famous painter, the baker, every child, the mayor, a curious robot, the gardener,
her grandmother, the pilot, a lonely whale, the new manager, my cousin,
the street musician, a busy lawyer, the shy poet, the driver
"""
)
_VERBS = _phrases(
    """
found, painted, carried, opened, repaired, described, watched, cooked, borrowed,
counted, discovered, explained, followed, ignored, measured, noticed, ordered, planted,
questioned, remembered, sold, visited, washed, wrote about, built, cleaned, collected,
delivered, forgot, hid
"""
)
_ADJECTIVES = _phrases(
    """
red, enormous, tiny, ancient, shiny, broken, wooden, golden, strange, quiet, noisy,
heavy, bright, dusty, frozen, gentle, hungry, purple, silver, wet, warm, famous, empty,
crowded, modern, fragile, green
"""
)
_OBJECTS = _phrases(
    """
box, bicycle, letter, garden, window, recipe, mountain, violin, bridge, lantern,
notebook, river, sandwich, telescope, umbrella, village, wallet, castle, computer,
dragon, engine, forest, guitar, island, jacket, kettle, ladder, map, necklace, orchard,
piano, quilt, rocket, statue, tractor
"""
)
_PLACES = _phrases(
    """
in the kitchen, near the harbour, at the station, behind the library,
under the old bridge, on the roof, inside the museum, across the valley,
beside the lake, in a small town, at the market, on the train, in the desert,
by the sea, at school, in the city centre, on a cold hill, in the basement
"""
)
_TIMES = _phrases(
    """
yesterday, last winter, this morning, every Sunday, at midnight, in 1999,
two weeks ago, before breakfast, after the storm, on Friday evening, in spring,
during the summer holidays, at 7:30, once a year, late at night
"""
)
_WORDS = _phrases(
    """
about above accept across action active actually add address admit adult afraid after
afternoon again against age agree ahead air allow almost alone along already also always
amount animal another answer anyone anything appear apple area argue arm army around arrive
art article artist ask attack attention autumn avoid away baby back bad bag ball bank bar
base basket bath beach bear beautiful because become bed before begin behind believe bell
below best better between big bird birthday black blanket blood blue board boat body bone
book border bottle bottom bowl brain branch bread break breakfast breath bring brown brush
budget build burn business butter button buy cake call calm camera camp candle capital car
card care carpet case cat catch cause ceiling centre certain chair chance change chapter
cheap check cheese chicken choice choose church circle citizen class clean clear climb
clock close cloud coast coat coffee coin cold colour come common company compare complete
concert condition consider contain continue control cook cool copy corner correct cost
cotton country course cover cream create crime cross crowd cry cup current customer cut
daily damage dance danger dark daughter day dead deal dear decide deep degree design desk
detail develop die difference difficult dinner direction dirty discuss disease distance
doctor dog door double down draw dream dress drink drive drop dry duck during dust early
earth east easy eat edge effect effort egg eight either election electric else empty end
enemy energy enjoy enough enter entire equal escape evening event exactly example except
exchange exercise expect expensive experience expert explain eye face fact fail fair fall
family far farm fast father fault fear feather feel festival field fight figure fill film
final find fine finger finish fire first fish five flag flat flight floor flower fly focus
follow food foot force foreign forget fork form forward four free fresh friend front fruit
full fun future game gas gate general gift give glad glass goal gold good government grass
great green ground group grow guess guest guide gun hair half hall hand happen happy hard
hat hate head health hear heart heat heavy help high hill history hold hole holiday home
honest hope horse hospital hot hotel hour house huge human hundred hurry husband ice idea
important improve include increase industry information insect instead interest invite
iron island job join journey judge juice jump just keep key kind king kiss knee knife knock
know lady lake lamp land language large laugh law lead leaf learn leave left leg lemon
lesson level library life light like line lion lip list listen little live lock long look
lose loud love low lucky lunch machine magazine main make man many market marry match
matter meal mean meat medicine meet member memory message metal middle milk mind minute
mirror miss mistake money month moon morning mother motor mouse mouth move music name
narrow nation nature near neck need nervous never news next nice night nine noise north
nose note nothing number nurse ocean offer office often oil open opinion orange order
other outside owner page pain paint pair paper parent park part party pass past path
pattern pay peace pencil people pepper perfect period person picture piece pink place
plan plant plastic plate play pleasant pocket point police polite pool poor popular
position possible potato pound power practice prepare present pretty price prince print
prison private prize problem produce promise proud public pull purpose push queen quick
rabbit race radio rain raise reach read ready reason receive record reduce region relax
remove rent reply report rest result return rice rich ride right ring rise road rock room
root rope rough round rule run sad safe sail salt same sand save say scale science score
screen sea season seat second secret see seed sell send sense serious serve seven shadow
shake shape share sharp sheep shelf ship shirt shoe shop short shoulder shout show shut
sick side sign silence simple sing sister sit six size skill skin sky sleep slow small
smell smile smoke snake snow soap soft soldier solve song soon sorry sound soup south
space speak special speed spend spoon sport square stairs stand star start stay steal
step stick still stone stop storm story straight stream street strong study subject sugar
summer sun supper support sure surprise sweet swim table tail take talk tall taste tax tea
team tear telephone tell ten test thank thick thin thing think thousand three throw ticket
tie tiger time tired today together tomorrow tongue tool tooth top touch tour towel tower
toy trade traffic travel tree trip trouble truck true trust try turn twelve twenty type
ugly uncle under understand uniform unit until upstairs use useful usual valley value
vegetable very view voice vote wait walk wall want war warm wash waste watch water wave
way weak wealth weather week weight welcome west wheel while white whole wide wife wild
win wind wine winter wish woman wonder wood word work world worry write wrong yard year
yellow young zero
""",
    sep=None,
)

_EXTRA = (
    "What is the capital of France? Paris is the capital of France.",
    "Please answer the question in one short sentence.",
    "The quick brown fox jumps over the lazy dog.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 3.14 -7 50% $19.99",
    "Symbols: ( ) [ ] { } < > + - * / = _ # @ & ! ? ; : , . ' \" ~ ^ | \\",
    "Hello, world! How are you today? I am fine, thank you.",
    "The user asked a question and the assistant gave a helpful answer.",
    "Summarize the following text, translate it into French, and list three key points.",
    'JSON example: {"id": "req-1", "method": "POST", "url": "/v1/chat/completions"}',
    "def main():\n    print('hello')\n\nif __name__ == '__main__':\n    main()\n",
)


def corpus() -> Iterator[str]:
    """Yield the fixed training corpus: a few hundred varied English sentences."""
    yield from _EXTRA
    n = 600
    for i in range(n):
        # Coprime strides walk every word list in a different order; no RNG involved.
        subj = _SUBJECTS[(i * 7) % len(_SUBJECTS)]
        verb = _VERBS[(i * 11 + 3) % len(_VERBS)]
        adj = _ADJECTIVES[(i * 13 + 5) % len(_ADJECTIVES)]
        obj = _OBJECTS[(i * 17 + 1) % len(_OBJECTS)]
        place = _PLACES[(i * 5 + 2) % len(_PLACES)]
        time = _TIMES[(i * 3 + 4) % len(_TIMES)]
        form = i % 6
        if form == 0:
            s = f"{subj.capitalize()} {verb} the {adj} {obj} {place} {time}."
        elif form == 1:
            s = f"{time.capitalize()}, {subj} {verb} a {adj} {obj} {place}."
        elif form == 2:
            s = f"Why did {subj} keep the {adj} {obj} {place}?"
        elif form == 3:
            s = f"Is the {obj} {place} really {adj}? {subj.capitalize()} says it is."
        elif form == 4:
            s = f"{subj.capitalize()} has {i % 97} {obj}s, and {i % 13} of them are {adj}!"
        else:
            s = f'"I {verb} the {obj}," said {subj}, "and it was {adj}."'
        yield s
    # Word-salad sentences over a list of common words give the BPE enough material.
    w = len(_WORDS)
    for i in range(300):
        words = [_WORDS[(i * 37 + j * 101) % w] for j in range(8 + i % 7)]
        words += [
            _WORDS[(i * 59 + j * 23 + 11) % w] + ("s" if j % 3 == 0 else "ing") for j in range(3)
        ]
        yield " ".join(words).capitalize() + (".", "?", "!", ";")[i % 4]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Train the byte-level BPE tokenizer on :func:`corpus` and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus()), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=MAX_POSITION_EMBEDDINGS,
        chat_template=CHAT_TEMPLATE,
    )


def _config_kwargs(tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    """Llama hyper-parameters; token ids come from ``tokenizer``."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 32,  # vLLM's CPU attention kernels need head_dim >= 32
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _build(tmp: Path, seed: int) -> None:
    """Write tokenizer, config, generation config and float32 weights into ``tmp``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(**_config_kwargs(tokenizer))
    config.architectures = ["LlamaForCausalLM"]
    model = seeded_model(LlamaForCausalLM, config, seed, std=0.02)
    with torch.no_grad():
        special_ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
        model.lm_head.weight[special_ids] = 0.0
    if model.dtype != torch.float32:
        raise RuntimeError(f"expected float32 weights, got {model.dtype}")
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)


def make_test_model(out_dir: Path, seed: int = 0) -> Path:
    """Build the tiny test model into ``out_dir`` (idempotent) and return ``out_dir``."""
    return build_atomically(Path(out_dir), lambda tmp: _build(tmp, seed), f"tiny-llama seed={seed}")
