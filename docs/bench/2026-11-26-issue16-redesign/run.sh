#!/bin/bash
set -x
W=random_imagenet,shard_stream
/tmp/oldtarget/release/storaged-bench --quick --workloads $W --out /tmp/b16/quick-old-1 > /tmp/b16/quick-old-1.log 2>&1
/work/main/target/release/storaged-bench --quick --workloads $W --out /tmp/b16/quick-new-1 > /tmp/b16/quick-new-1.log 2>&1
/tmp/oldtarget/release/storaged-bench --quick --workloads $W --out /tmp/b16/quick-old-2 > /tmp/b16/quick-old-2.log 2>&1
/work/main/target/release/storaged-bench --quick --workloads $W --out /tmp/b16/quick-new-2 > /tmp/b16/quick-new-2.log 2>&1
/tmp/oldtarget/release/storaged-bench --out /tmp/b16/full-old > /tmp/b16/full-old.log 2>&1
/work/main/target/release/storaged-bench --out /tmp/b16/full-new > /tmp/b16/full-new.log 2>&1
echo done > /tmp/b16/DONE
