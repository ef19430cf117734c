"""What to cut where: the Plan data, the cost model of ORT kernels, the speed planner, the measured
sensitivities and the fidelity knapsack, and the depth searches (``--target-*``, ``--min-agreement``)."""
