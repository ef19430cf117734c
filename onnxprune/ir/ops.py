"""Which ONNX ops treat channels independently: shared by analysis and rewrite.

A permutation (or selection) of the channel axis commutes with these ops, so it can travel
through them instead of being undone.
"""

CHANNELWISE_UNARY = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Clip", "Elu", "Selu", "Celu", "HardSigmoid",
    "HardSwish", "Softplus", "Softsign", "Identity", "Dropout", "Neg", "Abs", "Exp", "Log", "Sqrt",
    "Erf", "Gelu", "Mish", "ThresholdedRelu", "Cast", "Floor", "Ceil", "Round", "Reciprocal",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool",
})
ELEMENTWISE_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow"})
# op -> indices of its per-channel parameter inputs
CHANNEL_PARAM_NORMS = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2)}
UNIT_RESHAPES = frozenset({"Flatten", "Reshape", "Squeeze", "Unsqueeze"})
REDUCTIONS = frozenset({"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL2", "ReduceL1"})


def is_default_domain(node) -> bool:
    return node.domain in ("", "ai.onnx")
