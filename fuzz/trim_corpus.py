#!/usr/bin/env python3
"""Replaces fuzz/corpus/TARGET with at most N inputs that cover the most code.

    python3 fuzz/trim_corpus.py TARGET N [MORE_INPUT_DIRS...]

libFuzzer's `-merge=1` (what `cargo fuzz cmin` runs) keeps every input that adds a feature, which
for host_calls is thousands of files. Here a merge run only measures: with `-set_cover_merge=1`
and hit counts off, its control file lists the code edges each input reaches, and inputs are then
taken greedily, the one adding the most edges not yet covered first (the smaller on a tie), until
N are taken or none adds anything. Build the targets first (`scripts/fuzz.sh 0` only builds).
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

FUZZ = os.path.dirname(os.path.abspath(__file__))


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    target, limit, extra = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    binary = os.path.join(
        os.environ.get("CARGO_TARGET_DIR", os.path.join(FUZZ, "target")), "fuzz", target
    )
    corpus = os.path.join(FUZZ, "corpus", target)
    os.makedirs(corpus, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        control = os.path.join(scratch, "control")
        merged = os.path.join(scratch, "merged")
        os.mkdir(merged)
        subprocess.run(
            [binary, "-set_cover_merge=1", "-use_counters=0", f"-merge_control_file={control}",
             "-max_len=4096", merged, corpus, *extra],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        files, edges = read_control(control)
        chosen = choose(files, edges, limit)
        inputs = [open(files[index], "rb").read() for index in chosen]
    shutil.rmtree(corpus)
    os.mkdir(corpus)
    for data in inputs:
        with open(os.path.join(corpus, hashlib.sha1(data).hexdigest()), "wb") as out:
            out.write(data)
    covered = set().union(*(edges[index] for index in chosen)) if chosen else set()
    every = set().union(*edges.values()) if edges else set()
    print(
        f"{target}: kept {len(inputs)} of {len(files)} inputs, {sum(map(len, inputs))} bytes, "
        f"covering {len(covered)} of the {len(every)} edges they all reach"
    )


def read_control(path):
    """The input files and, for each, the edges it reached: its FT line, which lists every feature
    of the input in a set-cover merge (COV lines only list what earlier inputs did not reach)."""
    with open(path) as control:
        lines = control.read().splitlines()
    count = int(lines[0])
    files = lines[2 : 2 + count]
    edges = {}
    for line in lines[2 + count :]:
        words = line.split()
        if words and words[0] == "FT":
            edges[int(words[1])] = set(words[2:])
    return files, edges


def choose(files, edges, limit):
    covered, chosen = set(), []
    candidates = set(edges)
    while len(chosen) < limit and candidates:
        best = max(
            candidates, key=lambda i: (len(edges[i] - covered), -os.path.getsize(files[i]))
        )
        if not edges[best] - covered:
            break
        covered |= edges[best]
        chosen.append(best)
        candidates.remove(best)
    return chosen


if __name__ == "__main__":
    main()
