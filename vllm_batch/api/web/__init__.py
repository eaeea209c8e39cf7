"""The web dashboard at ``/dashboard``: an HTML shell, one script, one stylesheet.

``pages`` serves the shell and static files (no data, no key needed); ``data`` adds the
``/v1/dashboard/...`` JSON endpoints the script reads with the user's API key.
"""
