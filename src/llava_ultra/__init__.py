"""llava-ultra: build a Chinese/English medical vision-language assistant with the LLaVA-Ultra method.

The package reads like a book, one module per concern, data flowing one way:

    data/   reports + images -> instruction samples -> batches
    model/  CLIP + SAM encoders -> fusion -> adaptive frame selection -> LLM
    train/  the two-stage recipe on accelerate
    eval/   metrics (pure functions), runners, reports
    serve/  engine, OpenAI-compatible server, web page, chat
    cli.py  parses arguments and dispatches, nothing else
"""

__version__ = "0.1.0"
