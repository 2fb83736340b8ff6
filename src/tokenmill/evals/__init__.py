"""Quality comparisons across endpoints: graders for a team's own questions, and paired statistics."""
