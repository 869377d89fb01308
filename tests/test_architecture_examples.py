"""The examples of docs/architecture.md ("Adding a part") run against the real code.

They are how a newcomer learns where a feature goes; an example that no longer matches a
class name or signature would teach the wrong thing, so each is executed and used here.
"""

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedkd.codec import PayloadError, encode_update
from fedkd.config import ExperimentConfig
from fedkd.models import build_model
from fedkd.server_opt import OPTIMIZERS, make_server_optimizer
from server.kd_schedule import KDSchedule
from server.protocols import PROTOCOLS, make_protocol
from server.replies import Upload
from server.transport import Node
from wire import Content, metric_dict, pack, unpack

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def _examples() -> list[str]:
    text = DOC.read_text()
    section = text[text.index("## Adding a part"):]
    section = section[:section.index("\n## ", 1)] if "\n## " in section[1:] else section
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.fixture(scope="module")
def ns():
    """Every example executed in one namespace, in the page's order; registries restored after."""
    protocols, optimizers = dict(PROTOCOLS), dict(OPTIMIZERS)
    blocks = _examples()
    assert len(blocks) == 5
    space: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), space)
    yield space
    PROTOCOLS.clear(), PROTOCOLS.update(protocols)
    OPTIMIZERS.clear(), OPTIMIZERS.update(optimizers)


@pytest.fixture(autouse=True)
def _flower_identity():
    from flwr.supercore.task_identity import TaskIdentity
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


def test_the_protocol_example_decodes_an_item_table_upload_into_a_full_update(ns):
    cfg = ExperimentConfig.from_flat({"student-dim": 8, "max-len": 10})
    full = cfg.student_model(30)
    cloud = SimpleNamespace(num_items=30, refines=False)
    proto = make_protocol("item-table", cfg=cfg, cloud=cloud, student=build_model(full, seed=0),
                          fleet=SimpleNamespace(full_model=full, width_of={0: 8}), aggregator=None,
                          server_step=None, kd=KDSchedule(cfg, cloud))
    assert isinstance(proto, ns["ItemTableProtocol"])
    table = np.full((31, 8), 0.25, np.float32)
    node = Node(100, 0, 0, 10)
    got = proto.decode(Content(arrays={"update": encode_update({"item_emb.weight": table}, bits=8,
                                                               stochastic=False)}), node)
    assert set(got) == set(proto.layout) and np.allclose(got["item_emb.weight"], table, atol=1e-2)
    assert all(not got[k].any() for k in got if k != "item_emb.weight")
    with pytest.raises(PayloadError, match="expected only 'update'"):
        proto.decode(Content(arrays={"update": {}, "extra": {}}), node)


def _reply_of(mod, update: dict, seconds: float = 1.7) -> tuple[dict, Message]:
    """A ClientApp whose stand-in train handler sends ``update`` through the update slot."""
    from clients.mods.update import finish
    seen = []

    def handler(msg, context):
        seen.append(finish(dict(update)))
        return Message(pack(Content(metrics={"metrics": metric_dict({"train-seconds": seconds})})), reply_to=msg)

    app = ClientApp()
    app.train(mods=[mod])(handler)
    msg = Message(pack(Content(configs={"config": {"round": 1}})), dst_node_id=1, message_type="train")
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    reply = app(msg, ctx)
    return seen[0], reply


def test_the_item_table_mod_sends_only_the_table_when_its_protocol_runs(ns, monkeypatch):
    update = {"item_emb.weight": np.ones((3, 2), np.float32), "pos_emb.weight": np.ones((2, 2), np.float32)}
    monkeypatch.setitem(ns, "setup", lambda context: (SimpleNamespace(protocol="item-table"), None))
    assert list(_reply_of(ns["item_table_mod"], update)[0]) == ["item_emb.weight"]
    monkeypatch.setitem(ns, "setup", lambda context: (SimpleNamespace(protocol="params"), None))
    assert list(_reply_of(ns["item_table_mod"], update)[0]) == ["item_emb.weight", "pos_emb.weight"]


def test_the_aggregator_example_takes_the_coordinate_median(ns):
    node = Node(1, 0, 0, 1)
    uploads = [Upload(node, {}, {"w": np.array([v, -v], np.float32)}) for v in (1.0, 5.0, 2.0)]
    agg = ns["CoordinateMedian"]()(uploads, 1)
    np.testing.assert_array_equal(agg.update["w"], [2.0, -2.0])
    assert agg.update["w"].dtype == np.float32 and ns["CoordinateMedian"]()([], 1).update is None


def test_the_server_optimizer_example_is_registered_steps_and_checkpoints(ns):
    opt = make_server_optimizer("fedlion", eta=0.1)
    x, delta = {"w": np.zeros(3, np.float32)}, {"w": np.array([0.5, -2.0, 0.0], np.float32)}
    x1 = opt.step(x, delta)
    np.testing.assert_allclose(x1["w"], [0.1, -0.1, 0.0])
    again = make_server_optimizer("fedlion", eta=0.1)
    again.load_state_dict(opt.state_dict())
    np.testing.assert_array_equal(again.step(x1, delta)["w"], opt.step(x1, delta)["w"])
    with pytest.raises(ValueError, match="beta_1 must be in"):
        make_server_optimizer("fedlion", beta_1=1.5)


def test_the_client_behaviour_example_rounds_the_reported_training_time(ns):
    _, reply = _reply_of(ns["coarse_timing_mod"], {})
    assert unpack(reply.content).metrics["metrics"]["train-seconds"] == 2.0
