"""The SQLite job queue: atomic claims, fencing, recovery, cancel, metrics, logs and audit."""

from __future__ import annotations


def test_the_database_is_in_wal_mode_with_a_busy_timeout(queue):
    assert queue.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert queue.db.execute("PRAGMA busy_timeout").fetchone()[0] == 5000


def test_claims_take_the_highest_priority_then_the_oldest(queue):
    low = queue.submit("train", {"n": 1}, "alice")
    high = queue.submit("train", {"n": 2}, "bob", priority=5)
    later = queue.submit("train", {"n": 3}, "carol")
    claimed = [queue.claim(60) for _ in range(3)]
    assert [job.id for job in claimed] == [high.id, low.id, later.id]
    assert all(job.state == "running" and job.attempt == 1 for job in claimed)
    assert queue.claim(60) is None


def test_the_attempt_fences_out_a_superseded_worker(queue):
    job = queue.submit("train", {}, "u")
    first = queue.claim(60)
    assert queue.retry(first.id, first.attempt, {"code": "worker_crashed", "message": "m"})
    second = queue.claim(60)
    assert second.attempt == 2 and second.resume and second.failures == 1
    # the first attempt's late reports change nothing
    assert not queue.heartbeat(job.id, first.attempt, 60)
    assert not queue.finish(job.id, first.attempt, "succeeded", result={"stale": True})
    assert queue.finish(job.id, second.attempt, "succeeded", result={"path": "x"})
    assert queue.get(job.id).result == {"path": "x"}
    assert not queue.finish(job.id, second.attempt, "failed")  # ended once


def test_recover_requeues_what_a_previous_daemon_left_running(queue):
    running = queue.submit("train", {}, "u")
    queue.claim(60)
    cancelling = queue.submit("train", {}, "u")
    queue.claim(60)
    queue.request_cancel(cancelling.id)
    waiting = queue.submit("eval", {}, "u")
    recovered = {job.id: job for job in queue.recover()}
    assert set(recovered) == {running.id, cancelling.id}
    assert recovered[running.id].state == "queued" and recovered[running.id].resume
    assert recovered[cancelling.id].state == "cancelled"
    assert queue.get(waiting.id).state == "queued"
    assert queue.claim(60).id == running.id


def test_cancel_is_immediate_when_queued_and_a_flag_when_running(queue):
    queued = queue.submit("train", {}, "u")
    assert queue.request_cancel(queued.id).state == "cancelled"
    running = queue.submit("train", {}, "u")
    queue.claim(60)
    job = queue.request_cancel(running.id)
    assert job.state == "running" and job.cancel_requested


def test_expired_leases_are_found(queue):
    queue.submit("train", {}, "u")
    job = queue.claim(lease_seconds=-1)
    assert [j.id for j in queue.expired()] == [job.id]
    queue.heartbeat(job.id, job.attempt, 60)
    assert queue.expired() == []


def test_metric_points_of_a_resumed_step_replace_the_earlier_ones(queue):
    job = queue.submit("train", {}, "u")
    for step in (25, 50, 75):
        queue.add_metrics(job.id, 1, {"step": step, "loss": 1.0})
    queue.add_metrics(job.id, 2, {"step": 75, "loss": 0.5})
    points = queue.metrics(job.id)
    assert [p["step"] for p in points] == [25, 50, 75] and points[-1]["loss"] == 0.5
    assert [p["step"] for p in queue.metrics(job.id, since_step=50)] == [75]


def test_logs_audit_and_integrity(queue):
    job = queue.submit("train", {}, "u")
    first = queue.add_log(job.id, 1, "one")
    queue.add_log(job.id, 1, "two", "warning")
    assert [e["message"] for e in queue.logs(job.id)] == ["one", "two"]
    assert [e["message"] for e in queue.logs(job.id, since_id=first["id"])] == ["two"]
    queue.audit("alice (pid 1)", "job.cancel", "7", {"id": 7})
    entry = queue.audit_log()[0]
    assert (entry["who"], entry["action"], entry["target"]) == ("alice (pid 1)", "job.cancel",
                                                                "7")
    assert queue.integrity_check() == "ok"
    assert queue.counts()["queued"] == 1


def test_a_job_placed_first_is_claimed_by_id_only_while_queued(queue):
    low = queue.submit("train", {}, "u")
    high = queue.submit("train", {}, "u", priority=5)
    later = queue.submit("eval", {}, "u")
    assert [job.id for job in queue.queued()] == [high.id, low.id, later.id]  # claim order
    untouched = queue.get(later.id)
    assert (untouched.attempt, untouched.started_at) == (0, None)  # looked at, not claimed
    claimed = queue.claim(60, job_id=later.id)
    assert (claimed.id, claimed.state, claimed.attempt) == (later.id, "running", 1)
    assert queue.claim(60, job_id=later.id) is None  # running now
    queue.request_cancel(low.id)  # cancelled while it was being placed
    assert queue.claim(60, job_id=low.id) is None
    assert [job.id for job in queue.queued()] == [high.id]


def test_placing_a_worker_renews_the_lease(queue):
    queue.submit("train", {}, "u")
    job = queue.claim(lease_seconds=-1)  # the claim's lease ran out while it was placed
    assert [j.id for j in queue.expired()] == [job.id]
    assert queue.placed(job.id, job.attempt, "cuda:0", 4242, lease_seconds=60)
    placed = queue.get(job.id)
    assert (placed.device, placed.worker_pid) == ("cuda:0", 4242)
    assert queue.expired() == []
