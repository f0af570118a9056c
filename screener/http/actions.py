"""State-changing actions of the status page (the same effect as the CLI's `resend` and `complete`)."""

from __future__ import annotations

from screener.store import Store


def resend_study(store: Store, study_uid: str) -> int:
    """Re-queue one study, as ``screener resend STUDY_UID`` does: its failed outbox entries go back
    to pending (the study to `reported`); a study that failed before its SR was written goes back
    to `complete` to be screened again. Returns the number of items re-queued."""
    n = store.requeue_failed(study_uid)
    st = store.get_study(study_uid)
    if st is not None and st.state == "failed" and not st.sr_path:
        if store.set_study_state(study_uid, "complete", "re-queued from the status page", expect=("failed",)):
            n += 1
    return n
