"""`python -m cl ...` = `clbench ...` = `python run.py ...`."""
from cl.run import main

main()
