"""`python -m cl ...` = `clbench ...` = `python run.py ...`."""
from cl.app.run import main

main()
