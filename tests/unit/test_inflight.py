from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.inflight import InflightGuard
from syncd.model import Action, Batch, Destination, Member, MemberRecord, SourceRef, member_record

DEST = Destination("vip", "conn", 1, "US")


def rec(member: str, action: Action) -> MemberRecord:
    return member_record(member, "US", action, [{"email": "a" * 64}])


def sent(guard: InflightGuard, *records: MemberRecord, job: str) -> Batch:
    batch = Batch(DEST, [Member(r.external_user_id, r.action) for r in records])
    guard.register(batch)
    guard.bind(batch, job)
    return batch


def test_opposite_action_waits_for_the_job_and_latest_change_wins() -> None:
    g = InflightGuard()
    sent(g, rec("m1", Action.ADD), job="j1")
    assert g.admit(DEST, rec("m1", Action.REMOVE), SourceRef("t", 0, 1)) is False
    assert g.admit(DEST, rec("m1", Action.ADD), SourceRef("t", 0, 2)) is False  # queued behind
    assert g.admit(DEST, rec("m2", Action.REMOVE), SourceRef("t", 0, 3)) is True
    [held] = g.finished("j1")
    assert held.record.action is Action.ADD
    assert held.refs == [SourceRef("t", 0, 1), SourceRef("t", 0, 2)]
    assert g.readmit(held) is True
    assert g.members == 0


def test_same_action_is_not_held() -> None:
    g = InflightGuard()
    sent(g, rec("m1", Action.ADD), job="j1")
    assert g.admit(DEST, rec("m1", Action.ADD), SourceRef("t", 0, 1)) is True


def test_a_newer_job_keeps_the_member_in_flight() -> None:
    g = InflightGuard()
    sent(g, rec("m1", Action.ADD), job="j1")
    sent(g, rec("m1", Action.ADD), job="j2")
    assert g.finished("j1") == []
    assert g.admit(DEST, rec("m1", Action.REMOVE), SourceRef("t", 0, 1)) is False
    [held] = g.finished("j2")
    assert g.readmit(held) is True


def test_released_change_is_held_again_if_the_other_action_is_in_flight() -> None:
    g = InflightGuard()
    sent(g, rec("m1", Action.ADD), job="j1")
    assert g.admit(DEST, rec("m1", Action.REMOVE), SourceRef("t", 0, 1)) is False
    [held] = g.finished("j1")
    sent(g, rec("m1", Action.ADD), job="j2")  # an ADD from an open batch went out meanwhile
    assert g.readmit(held) is False
    assert g.held == 1


def test_rejected_batch_releases_its_members() -> None:
    g = InflightGuard()
    batch = Batch(DEST, [Member("m1", Action.ADD)])
    g.register(batch)
    assert g.admit(DEST, rec("m1", Action.REMOVE), SourceRef("t", 0, 1)) is False
    [held] = g.forget(batch)
    assert g.readmit(held) is True


@settings(max_examples=80)
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.sampled_from(list(Action)), st.booleans()), max_size=60
    )
)
def test_never_two_actions_in_flight_for_one_member(
    steps: list[tuple[int, Action, bool]],
) -> None:
    """Send each admitted change as its own job; randomly finish the oldest job. At no point
    do in-flight jobs of one member carry different actions."""
    g = InflightGuard()
    inflight: list[tuple[str, MemberRecord]] = []
    jobs = 0
    for offset, (member, action, finish) in enumerate(steps):
        if finish and inflight:
            job, _ = inflight.pop(0)
            for held in g.finished(job):
                if g.readmit(held):
                    jobs += 1
                    sent(g, held.record, job=f"j{jobs}")
                    inflight.append((f"j{jobs}", held.record))
        record = rec(f"m{member}", action)
        if g.admit(DEST, record, SourceRef("t", 0, offset)):
            jobs += 1
            sent(g, record, job=f"j{jobs}")
            inflight.append((f"j{jobs}", record))
        by_member: dict[str, set[Action]] = {}
        for _, r in inflight:
            by_member.setdefault(r.external_user_id, set()).add(r.action)
        assert all(len(actions) == 1 for actions in by_member.values())
