"""The floor for decoding one token per request: the least any daemon could cost.

A bare zmq REP server in a process of its own, with nothing but the model: each request runs one
greedy step over a transformers DynamicCache and replies with the token. Same checkpoint, device,
dtype, torch threads and inference mode as djinnd, so what djinnd costs beyond this is its own;
what this costs beyond in-process is the round trip and the idle processor between tokens.

    python -m scenarios.decode_floor SOURCE DEVICE DTYPE ENDPOINT
Requests: JSON [token ids] starts a sequence (its prefill), `null` decodes the next token.
"""

import json
import sys


def serve(source: str, device: str, dtype: str, endpoint: str) -> None:
    import torch
    import zmq
    from transformers import DynamicCache

    from djinnd import load_model, parse_dtype

    if device == "cpu":
        torch.set_num_threads(1)  # as djinnd runs on the CPU
    lm = load_model(source, device, parse_dtype(dtype))
    sock = zmq.Context.instance().socket(zmq.REP)
    sock.bind(endpoint)
    cache = step = None
    with torch.inference_mode():
        while True:
            ids = json.loads(sock.recv())
            if ids is not None:
                cache, step = DynamicCache(config=lm.model.config), torch.tensor([ids], device=lm.device)
            token = int(lm.forward(step, cache).argmax())
            step = torch.tensor([[token]], device=lm.device)
            sock.send(b"%d" % token)


if __name__ == "__main__":
    serve(*sys.argv[1:5])
