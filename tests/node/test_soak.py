"""kill -9 soak: a modality sends studies (some with late images) to a node subprocess that is killed
with SIGKILL at random (seeded) moments and restarted at once; the modality re-sends whatever was not
acknowledged. At the end: no acknowledged instance missing from the last SR delivered for its study,
nothing stuck, no stale SR delivered last (duplicates are allowed and counted).

Size: SCREENER_SOAK_STUDIES (default 50) studies of SCREENER_SOAK_IMAGES (default 4) images,
SCREENER_SOAK_KILLS (default 6) kills, seed SCREENER_SOAK_SEED (default 9)."""

from __future__ import annotations

import os
import random
import threading
import time

import pytest

from tests.node.state_helpers import (
    Modality,
    NodeProcess,
    fast_settings,
    quiescent,
    record_stats,
    small_gray,
    verdict,
    wait_until,
)
from tests.support.node_helpers import CollectingSCP

STUDIES = int(os.environ.get("SCREENER_SOAK_STUDIES", "50"))
IMAGES = int(os.environ.get("SCREENER_SOAK_IMAGES", "4"))
KILLS = int(os.environ.get("SCREENER_SOAK_KILLS", "6"))
SEED = int(os.environ.get("SCREENER_SOAK_SEED", "9"))


@pytest.mark.slow
def test_kill9_soak(tmp_path, built):
    rng = random.Random(SEED)
    engines_dir = built[1].parent
    grays = [small_gray(built[0].data, i) for i in range(3)]
    scp = CollectingSCP().start()
    var = tmp_path / "var"
    settings = fast_settings(var, engines_dir, [scp.destination], study_stable_s=0.3, batch_max_size=16)
    mod = Modality()
    plan = []  # (first images, late images)
    for k in range(STUDIES):
        late_n = 1 if rng.random() < 0.4 else 0
        study_uid, imgs = mod.study(grays[k % 3], IMAGES - late_n)
        plan.append((imgs, mod.late(grays[(k + 1) % 3], study_uid, late_n)))

    state = {"node": NodeProcess(settings, tmp_path).start(), "kills": 0}
    lock = threading.Lock()
    done = threading.Event()

    def port():
        with lock:
            n = state["node"]
            return n.port if n.alive else None

    def modality():
        pending = [imgs for imgs, _ in plan]
        late = [lt for _, lt in plan if lt]
        rng2 = random.Random(SEED + 1)
        while pending or late:
            if pending:
                batch = pending.pop(0)
            else:
                batch = late.pop(0)
            split = rng2.randint(1, len(batch))
            for part in (batch[:split], batch[split:]):
                todo = list(part)
                while todo:
                    mod.send(todo, port())
                    todo = [ds for ds in todo if ds.SOPInstanceUID not in mod.acked]
                    if todo:
                        time.sleep(0.1)
            if not pending and late and rng2.random() < 0.5:
                time.sleep(0.3)  # late images arrive while the first SR is screened or on the wire
        done.set()

    sender = threading.Thread(target=modality, daemon=True)
    sender.start()
    try:
        while state["kills"] < KILLS:
            time.sleep(rng.uniform(0.5, 2.5))
            with lock:
                state["node"].kill()  # SIGKILL
                state["kills"] += 1
                state["node"] = NodeProcess(settings, tmp_path).start()
        assert done.wait(300), "the modality could not deliver every image"
        assert wait_until(lambda: quiescent(var), 180, alive=lambda: state["node"].alive)
        assert state["node"].terminate(60) == 0
    finally:
        state["node"].kill()
        scp.stop()
    v = verdict(var, mod, scp.received)
    stats = {**v.as_dict(), "studies": STUDIES, "kills": state["kills"], "seed": SEED}
    record_stats("soak", stats)
    print("soak:", stats)
    assert v.acknowledged == STUDIES * IMAGES
    assert v.violations == [] and v.details == [], (v.violations, v.details[:10])
    assert (v.missing, v.stuck, v.stale_last) == (0, 0, 0)
