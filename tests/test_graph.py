"""graph.py: the producer/consumer index, constant lookup, name allocation and initializer
helpers every pass relies on."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxprune.ir.graph import (GraphIndex, NameAllocator, get_attr, has_subgraphs, remove_unused_initializers,
                             set_attr, set_initializer)


def _graph():
    """x -> Relu -> r; r -> Add(r, c_node) -> y (graph output); r also read by Mul(r, w) -> z;
    ``w`` an initializer, ``c_node`` from a Constant node, ``d`` an initializer that is also an
    input (an overridable default), ``unused`` read by nobody."""
    inits = [numpy_helper.from_array(np.arange(4, dtype=np.float32), "w"),
             numpy_helper.from_array(np.ones(4, np.float32), "d"),
             numpy_helper.from_array(np.zeros(2, np.float32), "unused")]
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Constant", [], ["c_node"], name="const",
                         value=numpy_helper.from_array(np.full(4, 2.0, np.float32))),
        helper.make_node("Add", ["r", "c_node"], ["y"], name="add"),
        helper.make_node("Mul", ["r", "w"], ["z"], name="mul"),
        helper.make_node("Add", ["z", "d"], ["zz"], name="add_d"),
    ]
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [4])  # noqa: E731
    return helper.make_graph(nodes, "g", [vi("x"), vi("d")], [vi("y"), vi("zz")], inits, value_info=[vi("z")])


def test_producer_and_consumers():
    index = GraphIndex(_graph())
    assert {name: node.name for name, node in index.producer.items()} == {
        "r": "relu", "c_node": "const", "y": "add", "z": "mul", "zz": "add_d"}
    assert [n.name for n in index.consumers["r"]] == ["add", "mul"]
    assert "x" not in index.producer and "w" not in index.producer


def test_use_count_counts_node_inputs_and_graph_outputs():
    index = GraphIndex(_graph())
    assert index.use_count("r") == 2
    assert index.use_count("y") == 1  # a graph output only
    assert index.use_count("z") == 1
    assert index.use_count("unused") == 0
    assert index.use_count("no such tensor") == 0


def test_a_node_reading_a_tensor_twice_counts_twice():
    graph = helper.make_graph([helper.make_node("Mul", ["x", "x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    assert GraphIndex(graph).use_count("x") == 2


def test_constant_reads_initializers_but_not_overridable_defaults_or_constant_nodes():
    index = GraphIndex(_graph())
    np.testing.assert_array_equal(index.constant("w"), np.arange(4, dtype=np.float32))
    assert index.constant("w").dtype == np.float32
    assert index.constant("d") is None  # also a graph input: the caller may feed another value
    assert index.constant("c_node") is None  # a Constant node's output (normalize folds those first)
    assert index.constant("r") is None and index.constant("nope") is None


def test_constant_node_outputs_become_constants_after_normalize():
    from onnxprune.ir.normalize import constants_to_initializers

    graph = _graph()
    constants_to_initializers(graph)
    np.testing.assert_array_equal(GraphIndex(graph).constant("c_node"), np.full(4, 2.0, np.float32))
    assert "const" not in [n.name for n in graph.node]


def test_name_allocator_never_repeats_a_taken_or_handed_out_name():
    graph = _graph()
    graph.node.append(helper.make_node("Identity", ["y"], ["r_1"], name="ident"))
    names = NameAllocator(graph)
    taken = {"x", "r", "y", "z", "zz", "w", "d", "unused", "c_node", "relu", "add", "mul", "const", "r_1", "ident"}
    assert taken <= names.taken
    assert names.new("fresh") == "fresh"
    assert names.new("fresh") == "fresh_1"
    assert names.new("r") == "r_2"  # r and r_1 are both taken
    assert names.new("relu") == "relu_1"
    handed = [names.new("w") for _ in range(5)]
    assert len(set(handed)) == 5 and not set(handed) & taken
    # deterministic: a second allocator over the same graph hands out the same names
    again = NameAllocator(graph)
    assert [again.new(b) for b in ("fresh", "fresh", "r", "relu")] == ["fresh", "fresh_1", "r_2", "relu_1"]


def test_name_allocator_sees_value_info_names():
    assert NameAllocator(_graph()).new("z") == "z_1"  # z is in value_info (and a node output)
    graph = _graph()
    graph.value_info.append(helper.make_tensor_value_info("annotated", TensorProto.FLOAT, [1]))
    assert NameAllocator(graph).new("annotated") == "annotated_1"


def test_set_initializer_replaces_in_place_or_appends():
    graph = _graph()
    order = [t.name for t in graph.initializer]
    set_initializer(graph, "d", np.full((2, 3), 7, np.int64))
    assert [t.name for t in graph.initializer] == order  # same position
    value = numpy_helper.to_array(graph.initializer[1])
    assert value.dtype == np.int64 and value.shape == (2, 3) and (value == 7).all()
    set_initializer(graph, "new", np.arange(6, dtype=np.float32).reshape(2, 3)[:, ::2])  # non-contiguous view
    assert [t.name for t in graph.initializer] == order + ["new"]
    np.testing.assert_array_equal(numpy_helper.to_array(graph.initializer[-1]), [[0, 2], [3, 5]])


def test_remove_unused_initializers_keeps_read_and_input_initializers():
    graph = _graph()
    graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.float32), "y"))  # named like an output
    remove_unused_initializers(graph)
    assert [t.name for t in graph.initializer] == ["w", "d", "y"]


def test_remove_unused_initializers_keeps_what_a_subgraph_reads():
    """An If branch reading an outer initializer keeps it, also two subgraph levels down."""
    outer = [numpy_helper.from_array(np.ones(1, np.float32), n) for n in ("in_then", "in_nested", "dead")]
    out = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1])  # noqa: E731
    nested = helper.make_graph([helper.make_node("Identity", ["in_nested"], ["n_out"])], "nested", [],
                               [out("n_out")])
    then = helper.make_graph([helper.make_node("Identity", ["in_then"], ["t_out"]),
                              helper.make_node("If", ["cond"], ["t2"], then_branch=nested, else_branch=nested)],
                             "then", [], [out("t_out")])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e_out"])], "else", [], [out("e_out")])
    graph = helper.make_graph([helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)], "g",
                              [helper.make_tensor_value_info("cond", TensorProto.BOOL, []), out("x")], [out("y")],
                              outer)
    assert has_subgraphs(graph)
    remove_unused_initializers(graph)
    assert [t.name for t in graph.initializer] == ["in_then", "in_nested"]
    assert not has_subgraphs(_graph())


def test_get_and_set_attr():
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=1, pads=[0, 0, 0, 0])
    assert get_attr(node, "group") == 1 and get_attr(node, "strides", "none") == "none"
    set_attr(node, "group", 4)
    set_attr(node, "strides", [2, 2])
    assert get_attr(node, "group") == 4 and get_attr(node, "strides") == [2, 2]
    assert [a.name for a in node.attribute].count("group") == 1
    onnx.checker.check_node(node)
