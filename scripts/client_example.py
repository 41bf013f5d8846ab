"""Client example (LightLLM's, adapted): ask the server about an image.

    python scripts/client_example.py --url http://127.0.0.1:8000 --image photo.png
    python scripts/client_example.py --url http://127.0.0.1:8000 --image-url https://example.com/cat.jpg --stream

Images go as base64 of the file bytes or as an http(s) URL the server fetches.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import urllib.request


def build_request(question: str, image_path: str | None, image_url: str | None, max_new_tokens: int) -> dict:
    images = []
    if image_path:
        with open(image_path, "rb") as f:
            images.append({"type": "base64", "data": base64.b64encode(f.read()).decode()})
    if image_url:
        images.append({"type": "url", "data": image_url})
    placeholders = "<image>\n" * len(images)
    prompt = f"<|im_start|>user\n{placeholders}{question}<|im_end|>\n<|im_start|>assistant\n"
    return {"inputs": prompt,
            "parameters": {"max_new_tokens": max_new_tokens, "do_sample": False, "stop_sequences": ["<|im_end|>"]},
            "multimodal_params": {"images": images}}


def post(url: str, body: dict):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=300)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--image", help="a local image file, sent as base64")
    p.add_argument("--image-url", help="an http(s) image URL for the server to fetch")
    p.add_argument("--question", default="What is in this image?")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--stream", action="store_true", help="use /generate_stream and print tokens as they come")
    a = p.parse_args()
    body = build_request(a.question, a.image, a.image_url, a.max_new_tokens)
    try:
        if a.stream:
            with post(a.url + "/generate_stream", body) as resp:
                for line in resp:
                    if line.startswith(b"data:"):
                        event = json.loads(line[5:])
                        print(event["token"]["text"], end="", flush=True)
            print()
        else:
            with post(a.url + "/generate", body) as resp:
                out = json.loads(resp.read())
            print(f"answer ({out['count_output_tokens']} tokens, {out['finish_reason']}, "
                  f"prompt {out['prompt_tokens']} tokens): {out['generated_text'][0]!r}")
    except urllib.error.HTTPError as e:
        print(f"HTTP {e.code}: {e.read().decode()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
