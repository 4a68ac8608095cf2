"""The real job on a GPU machine: cuDNN LSTM, float32 vs mixed_float16, one GPU vs all, NCCL, exact resume.

    python -m bench.gpu                                   # a GPU machine: writes docs/bench-results/gpu.json
    python -m bench.gpu --data PATH --output OUT.json
    python -m bench.gpu --cpu-rehearsal --output OUT.json # the same code on this CPU (CI): no GPU figures

Every figure comes from real runs of the job, ``imdb_dist.train.run`` (the
project's loop, global data plan, checkpoints, export, report), each in a
fresh process started as ``imdb-dist train`` starts one (the archive read
while TensorFlow loads), so a run's cold start is a user's; the figures are
read from each run directory's ``metrics.jsonl`` and ``report.json``. One
JSON, printed and written to ``--output``, holds:

1. ``devices``: TensorFlow's GPUs and their details, the CUDA and cuDNN it
   was built with, ``nvidia-smi``'s name, driver and memory, the CPU.
2. ``lstm``: the LSTM kernel that ran, as the layer reports it at run time:
   an LSTM built from the trained job layer's config plus tf_keras'
   ``return_runtime=True``, holding the job layer's weights, called in a
   tf.function under the run's strategy and dtype policy on the activations
   that reach the job's LSTM on a real batch. 2: cuDNN; 1: the generic
   kernel; 0: arguments that rule cuDNN out (``lstm.meaning``).
3. ``precision``: float32 against mixed_float16 on one GPU: steady
   examples/s (median of epochs 2 and later), the cold first epoch's, the
   run's wall time, and mixed precision's speedup on each. Most IMDB jobs
   are one or two epochs, so the cold part counts as much as the steady one.
4. ``all_devices``: MirroredStrategy over every visible GPU against one, at
   the same batch per GPU (the global batch grows with the GPUs); with one
   GPU visible it says "not measured".
5. ``nccl``: that all-GPU run's process ran with ``NCCL_DEBUG=INFO``: NCCL's
   own ``NCCL INFO`` lines counted, its version line quoted, and the
   all-reduce the job logged (``distribution.collective``).
6. ``exact_resume``: with ``train.deterministic=true``, a run stopped
   mid-epoch by a stop request (what SIGTERM makes: a checkpoint, then
   ``Interrupted``) and resumed in a fresh process, against an uninterrupted
   run: the exported weights compared bitwise; or the error of the op
   TensorFlow refused to run deterministically (also an answer).

Data: ``--data`` (an aclImdb directory or .tar.gz), else ``$IMDB_DATA``,
else ../shared/data/imdb/aclImdb_train.tar.gz, else reviews generated into
a temporary directory in the aclImdb layout (``"data": "synthetic"``).
Sizes are job/configs/ray-gpu.yaml's data and network (400 tokens, 20,000
words), 2 epochs of batch 256 per GPU over 22,500 training reviews: four
runs of the job on one GPU (float32, mixed, and the deterministic pair),
five with several, sized to finish within 5 minutes on one modern GPU
(not yet measured on one).
A short warm-up run of each precision comes first: the first process on a
machine reads the CUDA libraries from disk, starts the driver and, on a
GPU the TensorFlow build holds no kernel binaries for (an H100 or H200,
sm_90, with the pip wheel's compute_90 PTX: ``devices.kernels_jit_from_ptx``),
JIT-compiles TensorFlow's kernels, which CUDA caches (the children get a
cache large enough). Those once-per-machine costs would otherwise land in
whichever measured run came first. Each part runs once (no rounds): a
noisy machine shows in the figures.

Without a GPU it prints ``error: no GPU visible to TensorFlow: <reason>``
on stderr and exits 2. ``--cpu-rehearsal`` runs every part on the CPU
instead, so that CI exercises this code though no GPU is at hand: two
logical CPU devices (``distribution.cpu_devices=2``) stand in for "all
GPUs" and one for "one GPU", nvidia-smi and NCCL are not applicable, and
the JSON says ``"status": "cpu rehearsal: code path check, not GPU
figures"``. A rehearsal writes only to an ``--output`` given.

Exit status: 0; 2 no GPU (or bad arguments); 1 when a part failed (the JSON
is still written, the part's error in ``errors``).

The parts live in modules by job: ``plan`` (the runs' settings), ``data``
(the reviews), ``runs`` (a child process's runs of the job, read back),
``child`` (the child's side), ``lstm`` (the kernel probe), ``devices``,
``figures`` (speedups, all devices, NCCL) and ``resume``; ``__main__``
runs them in order.
"""
