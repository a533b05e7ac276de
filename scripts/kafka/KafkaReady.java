// Waits until a Kafka broker answers a metadata request, or gives up.
//   java -cp "<kafka libs>/*" KafkaReady.java HOST:PORT TIMEOUT_SECONDS
// Run by scripts/test-services with Java's single-file source launcher: an
// open port is not enough, the broker must have joined its KRaft quorum and
// be able to describe the cluster and list topics.
import java.time.Duration;
import java.time.Instant;
import java.util.Properties;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;

public class KafkaReady {
    public static void main(String[] args) throws Exception {
        Properties props = new Properties();
        props.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, args[0]);
        props.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "2000");
        props.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "3000");
        Instant deadline = Instant.now().plus(Duration.ofSeconds(Long.parseLong(args[1])));
        Exception last = null;
        try (Admin admin = Admin.create(props)) {
            while (Instant.now().isBefore(deadline)) {
                try {
                    int nodes = admin.describeCluster().nodes().get(3, TimeUnit.SECONDS).size();
                    admin.listTopics().names().get(3, TimeUnit.SECONDS);
                    if (nodes > 0) {
                        System.out.println("metadata from " + args[0] + ": " + nodes + " broker(s)");
                        return;
                    }
                } catch (Exception e) {
                    last = e;
                }
                Thread.sleep(200);
            }
        }
        System.err.println("no metadata from " + args[0] + " within " + args[1] + " s: " + last);
        System.exit(1);
    }
}
