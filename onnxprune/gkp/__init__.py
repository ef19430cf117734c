"""The paper's grouped kernel pruning (TMI-GKP): filter clustering into equal groups (TMI or magnitude),
the kept-kernel choice by the greedy cost, and ``plan_model`` which turns per-layer configs into a Plan."""
