"""Reads TensorBoard event files with TensorBoard's own reader and prints every scalar as JSON:
{"<run>": {"<tag>": [[step, value], ...]}}. Usage: tb_read.py LOGDIR"""
import json
import sys

from tensorboard.backend.event_processing import event_multiplexer

mux = event_multiplexer.EventMultiplexer()
mux.AddRunsFromDirectory(sys.argv[1])
mux.Reload()
out = {}
for run, tags in mux.Runs().items():
    out[run] = {tag: [[e.step, e.value] for e in mux.Scalars(run, tag)] for tag in tags.get("scalars", [])}
json.dump(out, sys.stdout, sort_keys=True)
