-- Less Postgres work per transfer (issue 15, docs/performance.md "Writer per transfer"): every
-- transfer updates two balance rows, and every post or void one transfer_status row. An update
-- that finds room on its row's page is heap-only (HOT): it adds no entry to the table's index and
-- its old version is pruned with the page, with no index entry for vacuum to remove. Pages that
-- inserts filled to the brim leave no such room, and each first update of a row there wrote a new
-- index entry as well. Leaving 15 % of each page free keeps those updates in place. (Only pages
-- filled from now on keep the room; a VACUUM FULL applies it to what exists.)
ALTER TABLE balances SET (fillfactor = 85);
ALTER TABLE transfer_status SET (fillfactor = 85);
