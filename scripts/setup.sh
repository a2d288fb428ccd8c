#!/usr/bin/env bash
# Installs what kvtuner's build, its main job and its tests need on a Debian/Ubuntu machine with
# Rust: the build's toolchain (cmake, clang and libclang for bindgen, ccache, git), Python with pip
# (the real models and texts come from PyPI), and what the tests drive kvtuner with (tmux for the
# interactive chat, curl and headless chromium for the server, and the clients agent users run:
# openai, langchain-openai, ollama; numpy for the CUDA kernels' host models). Run as root or as a
# user with sudo; does nothing already done.
set -euo pipefail
sudo=$([ "$(id -u)" -eq 0 ] || echo sudo)

need=()
command -v cmake > /dev/null || need+=(cmake)
command -v clang > /dev/null || need+=(clang)
ls /usr/lib/llvm-*/lib/libclang.so* > /dev/null 2>&1 || need+=(libclang-dev)
command -v ccache > /dev/null || need+=(ccache)
command -v git > /dev/null || need+=(git)
python3 -m pip --version > /dev/null 2>&1 || need+=(python3-pip)
command -v tmux > /dev/null || need+=(tmux)
command -v curl > /dev/null || need+=(curl)
command -v chromium > /dev/null || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq "${need[@]}"
fi

pydeps=(openai langchain-openai ollama pydantic numpy)
python3 -c "import openai, langchain_openai, ollama, pydantic, numpy" 2> /dev/null \
    || python3 -m pip install -q "${pydeps[@]}" 2> /dev/null \
    || python3 -m pip install -q --break-system-packages "${pydeps[@]}"
