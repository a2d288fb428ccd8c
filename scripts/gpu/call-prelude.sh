#!/usr/bin/env bash
# Sourced by a device study script (scripts/gpu/*-study.sh, or an earlier bench/gpu-h200/callNN/callNN.sh) on the lent GPU machine, from
# the repository root there:
#
#   NAME=call32 BUILD_DEADLINE=120 source .device-carry/call-prelude.sh
#
# Sets C (the carry), B (what the machine keeps between calls), O (this call's results), K (the
# kvtuner binary, unpacked from kvtuner.xz) and pack (tars O into $OUT/$NAME.tgz; also runs on
# exit, so a call cut short keeps what it measured: the device tool returns at most 8 files), then
# builds the CUDA libraries, or unpacks the ones built on the development machine (PREBUILT), with
# device-run.sh, and puts them on LD_LIBRARY_PATH.
# NAME=... before `source` lasts only while this file runs: keep it for the exit trap
CALL_NAME=$NAME
C=$PWD/.device-carry
B=$PWD/.device-build
OUT=${OUT:-/tmp/out}
O=/tmp/$CALL_NAME
mkdir -p "$O" "$OUT"
pack() { tar czf "$OUT/$CALL_NAME.tgz" -C "$O" .; }
trap pack EXIT
# kvtuner.bin, not kvtuner: with no $C/kvtuner, device-run.sh only builds
K=$C/kvtuner.bin
if [ ! -x "$K" ]; then
    python3 -c 'import lzma, sys; open(sys.argv[2], "wb").write(lzma.open(sys.argv[1]).read())' "$C/kvtuner.xz" "$K"
    chmod +x "$K"
fi
SKIP="stock speed fattn fbench ncu quality" DEADLINE=${BUILD_DEADLINE:-450} OUT=$OUT bash "$C/device-run.sh" build > "$O/build.txt" 2>&1 ||
    { tail -30 "$O/build.txt"; exit 1; }
export LD_LIBRARY_PATH=$B/lib-patched
grep -h "prebuilt\|build patched" "$O/build.txt" | tail -1
echo "libraries ready at ${SECONDS}s"
