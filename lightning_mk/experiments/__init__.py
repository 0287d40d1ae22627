"""The experiment app (``pip install 'lightning_mk[experiments]'``): models, data, baselines, the Hydra
entry point ``lightning-mk-run`` and the report ``lightning-mk-report``. Not needed by the callback."""
