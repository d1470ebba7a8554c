"""Code generated from protos/swarm.proto by scripts/gen_proto.py; do not edit by hand."""
