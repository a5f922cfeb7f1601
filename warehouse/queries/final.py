"""How every read of ``generations … FINAL`` is made exact and cheap: analytics, exports and
usage limits alike (each adds settings of its own)."""

FINAL_READ = {
    # Duplicates share the whole sorting key, so they always sit in one partition: FINAL
    # need not merge across partitions, and a day the settle job merged into one part is
    # read without merge work.
    "do_not_merge_across_partitions_select_final": 1,
    # No PREWHERE step under FINAL. With it, ClickHouse moves only sorting-key conditions
    # before the FINAL merge, and for these reads those are the scope (organisation,
    # workspace, time window): conditions whose granules the primary key has already chosen,
    # so the step rejected almost nothing, each row was tested twice (in PREWHERE and again
    # in WHERE) and its columns filtered once more. Measured (docs/analytics.md, "Measured on
    # 2026-11-26 23:30 – …"; docs/exports.md): the analytics benchmark's median p50 8 % lower;
    # an export slice with a model filter 75–85 against 86–89 ms, unfiltered the same or
    # faster; the usage-limits query the same. Set explicitly, because a server profile may
    # enable it.
    "optimize_move_to_prewhere_if_final": 0,
}
