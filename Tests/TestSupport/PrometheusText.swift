import Foundation

/// One sample of a Prometheus exposition, as Python's `prometheus_client`
/// parser reads it.
public struct PrometheusSample: Decodable, Sendable, Equatable {
    public var family: String
    public var type: String
    public var name: String
    public var labels: [String: String]
    public var value: Double
}

/// Parses `text` with the reference parser (`prometheus_client.parser`, in
/// the Python that `scripts/test` prepares and names in
/// `CORRAL_TEST_PYTHON`); throws when it refuses the text.
public func parsePrometheusText(_ text: String) async throws -> [PrometheusSample] {
    guard let python = ProcessInfo.processInfo.environment["CORRAL_TEST_PYTHON"], !python.isEmpty else {
        throw SetupError("CORRAL_TEST_PYTHON is not set: run the tests with scripts/test, which installs prometheus_client for them")
    }
    let file = FileManager.default.temporaryDirectory.appendingPathComponent("corral-metrics-\(UUID().uuidString).txt")
    try text.write(to: file, atomically: true, encoding: .utf8)
    defer { try? FileManager.default.removeItem(at: file) }
    let script = """
        import json, sys
        from prometheus_client.parser import text_string_to_metric_families
        samples = []
        for family in text_string_to_metric_families(open(sys.argv[1]).read()):
            for sample in family.samples:
                samples.append({"family": family.name, "type": family.type, "name": sample.name,
                                "labels": sample.labels, "value": sample.value})
        print(json.dumps(samples))
        """
    let result = try await runProgram(python, ["-c", script, file.path])
    guard result.status == 0 else { throw SetupError("prometheus_client refused the exposition: \(result.stderr)\n\(text.prefix(4000))") }
    return try JSONDecoder().decode([PrometheusSample].self, from: Data(result.stdout.utf8))
}

extension Array where Element == PrometheusSample {
    /// The value of the sample named `name` with exactly these labels.
    public func value(_ name: String, _ labels: [String: String] = [:]) -> Double? {
        first { $0.name == name && $0.labels == labels }?.value
    }
}
