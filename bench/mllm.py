"""CPU benchmark: tarflow's batched MLLM decoder vs Hugging Face `generate`, on a tiny Qwen2 with Tar's full
vocabulary, measured side by side in one run (the --tiny form of bench/gpu_mllm.py).

    python bench/mllm.py
"""
import os
import runpy
import sys

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "--tiny", *sys.argv[1:]]
    runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_mllm.py"), run_name="__main__")
