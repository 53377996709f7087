"""Offline tools that turn a dense Llama-family model into a sparse24 (2:4 + W8A8) checkpoint.

Layout (llm-compressor modifier style, one algorithm per file, pure tensor math apart from
model walking):

* ``offline.prune.magnitude`` / ``wanda`` / ``sparsegpt``: 2:4 pruning of one weight matrix
  (magnitude and the shared 2:4 helpers live in ``vllm_sparse24.sparsity``);
* ``offline.quantize``: per-output-channel symmetric int8 weights;
* ``offline.stats``: Hessian / input-norm accumulation and reconstruction error;
* ``offline.model_walk``: which architectures and linears, layer-0 input capture;
* ``offline.driver``: sequential layer-by-layer calibration;
* ``offline.export``: sparse24 and compressed-tensors dense W8A8 writers;
* ``offline.evaluate``: perplexity that matches the plugin's arithmetic;
* ``offline.compare``: several methods, one table, JSON + PNG;
* ``offline.__main__`` (``python -m offline``) and ``offline.cli`` (the ``vllm-sparse24``
  console command, which also starts the demo server and the CUDA build).
* ``offline.recover``: accuracy recovery of a sparse24 checkpoint by distillation from the dense
  model, mask fixed, int8 in the forward (``offline.block_recon``: its block-wise mode;
  ``offline.distill_loss``: chunked KL and SquareHead; ``offline.qat``: fake-quant linear;
  ``offline.student``: loading a checkpoint for training; ``offline.distill_data``: training data).

This package uses the plugin's pure modules (format, quantization, schema, checkpoint writing);
the plugin never imports this package. Nothing here imports vLLM.
"""
