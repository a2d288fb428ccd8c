#!/usr/bin/env bash
# issue 21/22 on the H200, call 32: the fattn-test pairs call 31's time limit cut off (kv3-kv3 from
# head size 256 on, kv2-q4_0, q4_0-kv2) at every new GQA ratio, head size, stream and draft case.
NAME=call32 BUILD_DEADLINE=60 source .device-carry/call-prelude.sh
g++ -O2 -std=c++17 -I$B/patched/ggml/include $C/fattn-test.cpp -o $B/fattn-test -L$B/lib-patched -lggml -lggml-base -lggml-cpu -Wl,-rpath,$B/lib-patched
timeout 120 $B/fattn-test "kv2-q4_0;q4_0-kv2;kv3-kv3" > $O/fattn-test.txt 2>&1
echo "fattn-test rc=$? ok=$(grep -c '^ok' $O/fattn-test.txt) FAIL=$(grep -c '^FAIL' $O/fattn-test.txt) at ${SECONDS}s"
grep '^FAIL' $O/fattn-test.txt | head; tail -1 $O/fattn-test.txt
