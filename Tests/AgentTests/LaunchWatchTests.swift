import Foundation
import NIOCore
import NIOPosix
import Testing

@testable import Agent

@Suite("Launch watch: the console's finished line and the SSH greeting")
struct LaunchWatchTests {
    @Test("the finished line is found across reads, with the uptime and a failed post-create script before it")
    func consoleScanner() throws {
        var scanner = ConsoleScanner()
        #expect(scanner.feed(Array("[   12.1] cloud-init[300]: Cloud-init v. 22.4.2 running 'modules:final'\r\n".utf8)) == nil)
        #expect(scanner.feed(Array("[   13.0] cloud-init[300]: 2026-11-24 10:00:00,000 - cc_scripts_user.py[WARNING]: Failed to run module scripts-user\r\n".utf8)) == nil)
        #expect(scanner.feed(Array("[   13.2] cloud-init[300]: corral: cloud-init fin".utf8)) == nil, "half a line is not the line")
        let found = scanner.feed(Array("ished after 13.21 s of uptime\r\nDebian GNU/Linux 12 web-1 ttyS0\r\n".utf8))
        let finished = try #require(found)
        #expect(finished == ConsoleScanner.Finished(uptime: "13.21", scriptFailed: true))
        #expect(finished.detail == "the post-create script failed (its output is on the console); guest uptime 13.21 s")

        var clean = ConsoleScanner()
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("console-\(UUID()).log")
        defer { try? FileManager.default.removeItem(at: file) }
        try "booting\n".write(to: file, atomically: true, encoding: .utf8)
        #expect(clean.scan(file.path) == nil)
        let handle = try FileHandle(forWritingTo: file)
        try handle.seekToEnd()
        try handle.write(contentsOf: Data("corral: cloud-init finished after 30.5 s of uptime\n".utf8))
        try handle.close()
        #expect(clean.scan(file.path) == ConsoleScanner.Finished(uptime: "30.5", scriptFailed: false))
        #expect(clean.scan("/nonexistent/console.log") == nil)
    }

    @Test("a flooded console costs a bounded window; a rotated log is read from its start")
    func consoleFlood() throws {
        var scanner = ConsoleScanner()
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("flood-\(UUID()).log")
        defer { try? FileManager.default.removeItem(at: file) }
        // 3 MiB without a newline: one scan reads at most readLimit, and the
        // unfinished line is kept to lineLimit bytes.
        try Data(repeating: UInt8(ascii: "x"), count: 3 << 20).write(to: file)
        for _ in 0..<4 { #expect(scanner.scan(file.path) == nil) }
        #expect(scanner.partial.count <= ConsoleScanner.lineLimit)
        // virtlogd rotates: the file starts again, shorter than what was read.
        try Data("\ncorral: cloud-init finished after 41.5 s of uptime\n".utf8).write(to: file)
        #expect(scanner.scan(file.path) == ConsoleScanner.Finished(uptime: "41.5", scriptFailed: false))
    }

    @Test("an SSH greeting counts; a port that says something else, closes at once, or is not listening does not")
    func sshGreeting() async throws {
        try await withGreeter("SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n") { port in
            #expect(await sshGreets(host: "127.0.0.1", port: port, timeout: .seconds(2)))
        }
        try await withGreeter("HTTP/1.1 400 Bad Request\r\n") { port in
            #expect(await !sshGreets(host: "127.0.0.1", port: port, timeout: .seconds(2)))
        }
        try await withGreeter("") { port in
            #expect(await !sshGreets(host: "127.0.0.1", port: port, timeout: .seconds(2)))
        }
        // A listener that never speaks: the probe gives up at its timeout.
        try await withGreeter(nil) { port in
            #expect(await !sshGreets(host: "127.0.0.1", port: port, timeout: .milliseconds(300)))
        }
        let closed = try await withGreeter("") { $0 }
        #expect(await !sshGreets(host: "127.0.0.1", port: closed, timeout: .seconds(2)))
    }

    /// A loopback TCP server that writes `greeting` to each connection and
    /// closes it ("" closes at once; nil keeps it open, silent).
    func withGreeter<T: Sendable>(_ greeting: String?, _ body: (Int) async throws -> T) async throws -> T {
        let server = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                guard let greeting else { return channel.eventLoop.makeSucceededVoidFuture() }
                return channel.pipeline.addHandler(Greeter(greeting: greeting))
            }
            .bind(host: "127.0.0.1", port: 0).get()
        let port = try #require(server.localAddress?.port)
        do {
            let result = try await body(port)
            try await server.close()
            return result
        } catch {
            try? await server.close()
            throw error
        }
    }
}

/// Writes its greeting to a new connection and closes it.
final class Greeter: ChannelInboundHandler, Sendable {
    typealias InboundIn = ByteBuffer
    let greeting: String

    init(greeting: String) { self.greeting = greeting }

    func channelActive(context: ChannelHandlerContext) {
        let channel = context.channel
        context.writeAndFlush(NIOAny(ByteBuffer(string: greeting))).whenComplete { _ in channel.close(promise: nil) }
    }
}
