"""clbench from a checkout: `python run.py <overrides>` is the `clbench` command (cl/app/run.py holds it).

    python run.py                                   # the embedded default (digits, no downloads)
    python run.py strategy=simplecil scenario=synthetic seed=1
    python run.py -m strategy=finetune,joint,simplecil debug=fast

Exit codes: 0 done; 2 a one-line `error: ...` the user can fix; 75 interrupted after checkpointing (docs/architecture.md §7).
"""
from cl.app.run import main

if __name__ == "__main__":
    main()
