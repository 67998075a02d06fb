-- A sample made from an alert's evidence is a picture of a student's screen: it belongs to that exam and
-- goes with it when the exam's data is purged. Recorded samples (a teacher's own screen) have no exam.
ALTER TABLE samples ADD COLUMN exam_id BIGINT REFERENCES exams (id);
CREATE INDEX samples_exam ON samples (exam_id);
