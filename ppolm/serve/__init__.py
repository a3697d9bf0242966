"""OpenAI-compatible serving of a ppolm model: `create_app` (FastAPI), `run_server` (uvicorn), request limits."""

from ppolm.serve.app import create_app, load_served, run_server, serve_in_background
from ppolm.serve.engine import DecodingDefaults, Engine
from ppolm.serve.limits import ApiError, ServeLimits
from ppolm.serve.request import EngineStats, SamplingParams

__all__ = [
    "ApiError",
    "DecodingDefaults",
    "Engine",
    "EngineStats",
    "SamplingParams",
    "ServeLimits",
    "create_app",
    "load_served",
    "run_server",
    "serve_in_background",
]
