"""Commands of the ``liteattention`` command line that have their own module: calibrate, and bench --model
(model_bench)."""
