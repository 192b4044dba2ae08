import os

# Keep each test process (and the ranks it spawns) to few threads on 2-core machines.
os.environ.setdefault("OMP_NUM_THREADS", "1")
