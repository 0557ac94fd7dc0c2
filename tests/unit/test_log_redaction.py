"""Log lines of failed jobs name no UIDs: the reader's messages carry spool paths made of them."""

from glio_node.redact import without_uids


def test_uids_in_spool_paths_are_replaced_and_versions_and_statuses_kept():
    path = (
        "/srv/spool/instances/1.2.826.0.1.3680043.8.498.1/2.25.333728254786794636001756910208"
        "/2.25.204293893555282190054452098113298426540.dcm"
    )
    text = f"{path}: a concatenation of 3 instances arrived with only 2 (bundle 1.0.0, 0xA700)"
    assert without_uids(text) == (
        "/srv/spool/instances/<uid>/<uid>/<uid>.dcm: a concatenation of 3 instances arrived "
        "with only 2 (bundle 1.0.0, 0xA700)"
    )


def test_a_peers_ipv4_address_is_kept_while_a_uid_beside_it_is_not():
    text = "C-STORE of 1.2.826.0.1.3680043.8.498.12345 from PACS at 192.168.100.120:11112"
    assert without_uids(text) == "C-STORE of <uid> from PACS at 192.168.100.120:11112"


def test_the_receivers_log_lines_name_no_uid_whatever_the_handler(caplog):
    """The receiver's logger redacts its records itself, so a caplog handler, journald or an
    operator's own logging config all get the same text; arguments, tracebacks included."""
    import logging

    from glio_node.receive import scp

    sop = "2.25.204293893555282190054452098113298426540"
    with caplog.at_level(logging.INFO, logger=scp.__name__):
        scp.log.info("C-STORE of %s: already stored, not stored again", sop)
        try:
            raise OSError(f"/srv/spool/instances/{sop}.dcm: disk full")
        except OSError:
            scp.log.exception("C-STORE of %s from %s failed unexpectedly", sop, "PACS")
    assert "C-STORE of <uid>: already stored, not stored again" in caplog.text
    assert "/srv/spool/instances/<uid>.dcm: disk full" in caplog.text
    assert sop not in caplog.text


def test_every_logger_of_the_receiver_poller_senders_and_scheduler_redacts():
    from glio_node import scheduler
    from glio_node.pull import poller
    from glio_node.receive import scp
    from glio_node.redact import UidRedactor
    from glio_node.send import dimse
    from glio_node.worker import commit, deliver, liveness, purge, run, sweep

    for module in (scp, poller, dimse, scheduler, sweep, run, liveness, deliver, commit, purge):
        assert any(isinstance(f, UidRedactor) for f in module.log.filters), module.__name__
