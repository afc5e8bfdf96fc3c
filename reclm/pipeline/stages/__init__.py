"""The twelve stages of ``reclm run``, in order, each with what it reads and where it writes.

| # | stage      | folder      | needs                                   |
|---|------------|-------------|-----------------------------------------|
| 1 | prepare    | data/       | dataset files                           |
| 2 | teacher    | teacher/    | prepare (+ teacher files)               |
| 3 | sft        | sft/        | prepare, teacher                        |
| 4 | neighbours | neighbours/ | prepare (similar users; item text)      |
| 5 | collab     | collab/     | prepare, teacher, sft, neighbours       |
| 6 | reward     | reward/     | prepare, teacher, sft, neighbours       |
| 7 | rl         | rl/         | prepare, sft, collab, reward, neighbours|
| 8 | item_side  | item_sft/   | prepare, teacher, sft, neighbours       |
| 9 | profiles   | profiles/   | prepare, teacher, sft, collab, rl, item_side |
|10 | encode     | embeddings/ | prepare, profiles                       |
|11 | train_cf   | cf/         | prepare, encode                         |
|12 | report     | report/     | every stage above                       |

Stage bodies call the areas' public functions
(``reclm.llm``, ``reclm.cf``, ``reclm.text``); this package only wires them to the run directory. The
stage table that joins bodies, keys and estimates is :mod:`reclm.pipeline.table`.
"""
