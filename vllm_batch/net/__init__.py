"""Outbound HTTP: the URL (SSRF) guard and the audio endpoints' ``file_url`` fetcher."""
