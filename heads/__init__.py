"""Heads and scratch baselines on cached features, in wings that import only the wings below them (pinned by
the `heads-inside` import contract in setup.cfg; docs/explanation/design.md lists every module):

- use: predict, export, inspect (`inference`, `predict`, `export`, `mistakes`, `endtoend`...);
- experiments: search, the curve, the long-tail table (`trials`, `curve`, `longtail`, `search`...);
- runs: run folders, reports, TensorBoard logs (`train`, `reports`, `logs`);
- the loop: one fitting loop, K heads in one pass (`fit`, `together`);
- the feed: how rows reach a model (`data`, `feed`, `batches`);
- the models: options, builders, the probe, kNN, class weights, metrics, provenance.
"""
