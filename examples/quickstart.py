"""Run a 3-question chat batch on a local vLLM Batch Server with the official openai SDK."""

import json
import os
import time

from openai import OpenAI

client = OpenAI(
    base_url=os.environ.get("VLLM_BATCH_URL", "http://127.0.0.1:4080/v1"),
    api_key=os.environ.get("VLLM_BATCH_API_KEY", "none"),
)
questions = ["What is the capital of France?", "What is 2+2?", "Name a primary colour."]
lines = [
    {
        "custom_id": f"q{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "SmolLM2-135M-Instruct",
            "max_tokens": 32,
            "temperature": 0,
            "messages": [{"role": "user", "content": question}],
        },
    }
    for i, question in enumerate(questions)
]
upload = client.files.create(
    file=("questions.jsonl", "\n".join(map(json.dumps, lines)).encode()), purpose="batch"
)
batch = client.batches.create(
    input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
)
while batch.status not in ("completed", "failed", "expired", "cancelled"):
    time.sleep(1)
    batch = client.batches.retrieve(batch.id)
print("batch", batch.id, batch.status, batch.request_counts)
for line in client.files.content(batch.output_file_id).text.splitlines():
    result = json.loads(line)
    answer = result["response"]["body"]["choices"][0]["message"]["content"]
    print(result["custom_id"], " ".join(answer.split()))
