"""Offline tools that turn a dense Hugging Face model into a sparse24 (2:4 + W8A8) checkpoint.

Layout (llm-compressor modifier style, one algorithm per file, pure tensor math apart from
model walking):

* ``sparse24_tools.prune``: the registry of 2:4 pruning methods (``magnitude`` / ``wanda`` /
  ``sparsegpt``, one file each; the selection helpers live in ``vllm_sparse24.sparsity``), each
  declaring the input statistics it needs;
* ``sparse24_tools.compress_options`` / ``recover_options``: the options of compress and recover,
  whose fields are the command-line flags (``sparse24_tools.options``);
* ``sparse24_tools.quantize``: per-output-channel symmetric int8 weights;
* ``sparse24_tools.stats``: Hessian / input-norm accumulation and reconstruction error;
* ``sparse24_tools.architectures``: per-architecture facts (decoder stack, linear groups, norms);
* ``sparse24_tools.model_walk``: walking a model by them, layer-0 input capture, loading;
* ``sparse24_tools.driver``: sequential layer-by-layer calibration;
* ``sparse24_tools.export``: sparse24 and compressed-tensors dense W8A8 writers;
* ``sparse24_tools.evaluate``: perplexity that matches the plugin's arithmetic;
* ``sparse24_tools.compare``: several methods, one table, JSON + PNG;
* ``sparse24_tools.__main__`` (``python -m sparse24_tools``) and ``sparse24_tools.cli`` (the ``vllm-sparse24``
  console command, which also starts the demo server and the CUDA build).
* ``sparse24_tools.recover``: accuracy recovery of a sparse24 checkpoint by distillation from the dense
  model, mask fixed, int8 in the forward (``recover_options``: its options; ``recover_run``: the
  run's state and schedule; ``recover_global`` / ``recover_blocks``: the two training loops;
  ``distill_loss``: chunked KL and SquareHead; ``qat``: fake-quant linear; ``student``: loading a
  checkpoint for training; ``distill_data``: training data).
* ``sparse24_tools.provenance``: machine, versions and date for the reports.

This package uses the plugin's pure modules (format, quantization, schema, checkpoint writing);
the plugin never imports this package. Nothing here imports vLLM.
"""
