"""Scaling studies: ``jaxvc sweep`` runs a grid of training runs and turns them into one table, fits and plots.

* ``grid.py``    ``--grid key=v1,v2`` specs -> the list of points (model size, global batch, LR, mesh, any key)
* ``sizes.py``   the model-size axis: a table of UNet widths (multipliers of the config's widths; ``sd15`` for pods)
* ``point.py``   one point with the real trainer, in its own process (so it can pick its device count): step time,
                 samples/s, MFU, parameters, FLOPs per step, loss curve -> ``<out>/points/<id>/result.json``
* ``collect.py`` the points' results -> ``results.csv`` / ``results.json`` and the printed summary table
* ``fit.py``     least-squares scaling fits: loss vs compute, throughput vs chips, optimal LR vs batch
* ``plots.py``   the PNGs: loss vs compute, throughput vs chips, optimal LR vs batch, loss curves
* ``cli.py``     the command
"""
