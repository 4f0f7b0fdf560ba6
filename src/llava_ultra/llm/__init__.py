"""LLM access through OpenAI-compatible chat endpoints: the client (scrubbing, retries, cache,
cost, dry run), resumable batch jobs, and the few-shot prompts shipped as package data.

Users: `data/llm_instruct.py` (LLM-written instruction data and extended captions) and
`eval/judge.py` (the LLaVA-Med / LLaVA-Bench judge). See docs/llm.md.
"""
