"""`tuner ui`: the personalization workflow in a browser (photos, task, train, compare, publish) over the suite's
own library; `tuner.ui.server.serve` is the entry point. Needs the `ui` extra (FastAPI, uvicorn)."""
