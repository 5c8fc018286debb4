-- The packages the server resolved for a job at submit (a
-- jobfile::deps::Resolution as JSON): what every host installs exactly,
-- what a lease carries and what the job's view shows. NULL: none declared.
ALTER TABLE jobs ADD COLUMN packages TEXT;
