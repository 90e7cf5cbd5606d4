"""`captioner serve`: a REST API (FastAPI) and a browser UI (Gradio) in one process, sharing one model.

Requests from both faces go through one `Batcher` (batcher.py): a worker thread that owns the model and gathers
the requests that arrive within a few milliseconds of each other into one encoder and decoder pass. api.py has
the routes and `create_app`; schemas.py what they take and answer; payload.py reads request bodies; photos.py
checks and resizes images in one bounded pool, never on the event loop; guards.py the API key and per-client
cap and the CORS origins; middleware.py the body limit, a refused request's one line in the log, and the bare
500 with an id (the traceback goes to the log under that id); ui.py the Gradio page.
"""
from .api import create_app, model_info
from .batcher import BATCH_WAIT_MS, MAX_BATCH_SIZE, MAX_QUEUE, Batcher, Busy, Closed, Result
from .guards import API_KEY_ENV, access_control, is_loopback
from .photos import MAX_PIXELS, MAX_UPLOAD_BYTES
from .schemas import CaptionResponse, Options
from .ui import build_ui, example_photos

__all__ = ["API_KEY_ENV", "BATCH_WAIT_MS", "MAX_BATCH_SIZE", "MAX_PIXELS", "MAX_QUEUE", "MAX_UPLOAD_BYTES", "Batcher",
           "Busy", "CaptionResponse", "Closed", "Options", "Result", "access_control", "build_ui", "create_app",
           "example_photos", "is_loopback", "model_info"]
