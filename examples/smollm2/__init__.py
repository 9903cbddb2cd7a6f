"""The SmolLM2 example of fastirl (``examples/smollm2_reasoning.py`` is its entry
point): the task (``task``), metrics and statistics (``metrics``), the model and
the scores of samples (``model``), training with IQTrainer (``train``), the grid
of jobs (``grid``), the resources of a step (``resources``) and the results page
(``report``)."""
