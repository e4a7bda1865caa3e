"""Using a combination live: streamed generation (``lorablocks generate``) and an OpenAI-compatible server
whose composition of blocks changes in place, exactly (``lorablocks serve``).

The HTTP layer (:mod:`lorablocks.serving.server`, FastAPI and uvicorn) is imported only when serving.
"""

from lorablocks.serving.blocks import BlockLibrary, live_recipe
from lorablocks.serving.generation import SamplingParams, encode_chat, encode_prompt, generate_stream, generate_text
from lorablocks.serving.live import BASE_FINGERPRINT, LiveModel, Runner

__all__ = ["BlockLibrary", "live_recipe", "SamplingParams", "encode_chat", "encode_prompt", "generate_stream",
           "generate_text", "BASE_FINGERPRINT", "LiveModel", "Runner"]
